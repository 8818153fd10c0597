"""The data pipeline, one job per file.

- ``folder``: image folders (ImageFolder, LocalMIM's train folder, flat folders) and the RGB loader that
  reports corrupt files.
- ``demo``: the synthetic shape classes of the demo recipes.
- ``subsets``: index-returning and few-shot views of a dataset.
- ``transfer``: the transfer datasets (CIFAR, Flowers, Pets, Cars, iNat, split files) and ``build_splits``.
- ``transforms``: pretraining, fine-tuning and evaluation transforms.
- ``loaders``: keyed, split-invariant training loaders.
"""
