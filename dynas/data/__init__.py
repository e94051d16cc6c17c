"""Datasets held in memory as uint8 tensors, split for a search, with batch-wise torch augmentation."""

from dynas.data.bundle import SPLITS, Augmentation, DataBundle, Split, channel_stats
from dynas.data.datasets import DATASETS, load_data
from dynas.data.formats import RawDataset
from dynas.data.loader import BatchLoader
from dynas.data.transforms import normalize, random_crop, random_hflip, resize

__all__ = [
    "DATASETS",
    "SPLITS",
    "Augmentation",
    "BatchLoader",
    "DataBundle",
    "RawDataset",
    "Split",
    "channel_stats",
    "load_data",
    "normalize",
    "random_crop",
    "random_hflip",
    "resize",
]
