"""Datasets and the input pipeline: store -> dataset -> decode/augment -> batches."""

from effitrain.data.dataset import ImageFolderLMDB as ImageFolderLMDB
from effitrain.data.loader import make_loader as make_loader
from effitrain.data.prefetch import DevicePrefetcher as DevicePrefetcher
