"""streamtrain: streaming trainer for vision/audio-language models on WebDataset shards."""

__version__ = "0.1.0"
