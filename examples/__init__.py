"""The classic PyTorch tutorials' feed-forward systems, each as the tutorial writes it with this
library swapped in by ``kernels.fuse`` / ``kernels.fuse_optimizer``; ``--impl torch`` runs the
same script on plain PyTorch. Run one as ``python -m examples.<name> --help``."""
