"""The cell / background family (`cpsam binary`): ResNet U-Nets that predict a cell probability, trained and
distilled through the one training loop (`train.loop`).

- `objective`: the binary and soft-target distillation objectives and their dataset (registered as the
  `binary` and `binary_distill` plug-ins of `train.objective`).
- `data`: the image layouts it reads (folders of pairs, FullImage/Mask_Norm/codes.txt, TRAIN_IMG_DIR/...).
- `loading_codes`: how channels are loaded into the network's inputs.
- `workflow`: train, distill, predict, compare and explore as functions; `cli`: the `cpsam binary` commands.
- `predict`: probability maps and connected-component masks; `report`: histories, plots, comparison tables.

Nothing is imported here, so `cpsam binary --help` loads no network code.
"""
