"""jaxllm: train and fine-tune decoder-only LLMs with JAX/Flax."""

__version__ = "0.1.0"


class JaxllmError(Exception):
    """A mistake a user can fix (bad config, missing file, bad mesh). Printed as one line by the CLI."""
