"""`python -m cpsam` is the `cpsam` command; Ctrl-C anywhere (even while it imports) is one line, exit 130."""

import sys


def _main() -> int:
    """Run `cpsam.cli.main`, turning a KeyboardInterrupt that no subcommand handled into one line."""
    try:
        from cpsam.cli import main  # inside the try: Ctrl-C while the command imports is caught too

        return main()
    except KeyboardInterrupt:
        print("cpsam: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


sys.exit(_main())
