"""Data preparation: raw webdataset image shards -> feature files -> train/val/test splits.

- `xcent.extract.shards`: reading tar shards, ``--data-url`` brace expansion, skip reasons.
- `xcent.extract.backbones`: iresnet (Glint360K), BioCLIP via open_clip (TreeOfLife-10M),
  and tiny stand-ins for tests; chosen by name.
- `xcent.extract.cli`: ``xcent extract`` (resumable, memory-mapped output) and ``xcent split``.
- `xcent.extract.split`: the deterministic train/val/test split of the cached rows.

Nothing here is imported by training; the extras (``pip install "xcent[extract]"``) are
needed only for ``--arch bioclip``.
"""
