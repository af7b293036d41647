"""Building blocks of reports: Markdown/CSV tables (`tables`) and PNG figures (`plots`).

Shared by `cpsam eval` (eval.report) and `cpsam distill eval` (distill.evaluate); what a report
contains is decided there, how a table or a figure is written is decided here.
"""
