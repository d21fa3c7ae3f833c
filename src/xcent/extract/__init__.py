"""Data preparation (library): raw webdataset image shards -> feature files -> train/val/test splits.

- `xcent.extract.datasets`: the dataset registry (``--data``): how a sample maps to its
  global row and label, and each dataset's default backbone.
- `xcent.extract.backbones`: the backbone registry (``--arch``): iresnet (Glint360K),
  BioCLIP via open_clip (TreeOfLife-10M); `register_arch` adds one.
- `xcent.extract.shards`: reading tar shards, ``--data-url`` brace expansion, skip reasons.
- `xcent.extract.batches`: the IterableDataset that turns shards into image batches.
- `xcent.extract.store`: the resumable, memory-mapped feature store.
- `xcent.extract.run`: the extraction loop (`extract_features`).
- `xcent.extract.split`: the deterministic, all-or-nothing train/val/test split.

The commands ``xcent extract`` and ``xcent split`` are in `xcent.cli.extract`. Nothing
here is imported by training; the extras (``pip install "xcent[extract]"``) are needed
only for image decoding and ``--arch bioclip``.
"""
