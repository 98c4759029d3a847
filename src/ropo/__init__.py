"""ropo: Robust Preference Optimization (Liang et al., arXiv 2404.04102) in plain PyTorch."""

__version__ = "0.1.0"
