"""daskpath: Ki67 tumor ratios in whole-slide images at cluster scale."""
__version__ = "0.1.0"
