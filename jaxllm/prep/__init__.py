"""Offline data preparation (`jaxllm prep`): raw corpora -> cleaned, filtered, deduplicated, tokenized,
curriculum-ordered ArrayRecord shards that `data.source=array_record` reads."""

from jaxllm.prep.config import PrepConfig
from jaxllm.prep.core import prepare

__all__ = ["PrepConfig", "prepare"]
