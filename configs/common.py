"""Every section and key a run config may set; the configs in this folder start from it and change what
they need:

    c = load_config(os.path.join(os.path.dirname(__file__), "common.py"))
    c.model.update(num_layers=4, embed_dim=192)

Each key's default and meaning live once, in its section's frozen dataclass (the field's default and
comment); this file only gathers them: model `jaxllm.models.config.ModelConfig`, data
`jaxllm.data.config.DataConfig`, optim `jaxllm.train.optimizer.OptimConfig`, train `jaxllm.train.run.TrainConfig`,
mesh `jaxllm.sharding.MeshConfig`, checkpoint `jaxllm.train.checkpoint.CheckpointConfig`, generate
`jaxllm.models.generation.GenerateConfig`, distributed `jaxllm.distributed.DistributedConfig`, lora
`jaxllm.models.lora.LoraConfig`, preference `jaxllm.train.preference.PreferenceConfig`, prune
`jaxllm.train.prune.PruneConfig`. `jaxllm config --config=configs/NAME.py` prints a config whole, after
its changes and any overrides.
"""

import ml_collections

from jaxllm.config import defaults
from jaxllm.data.config import DataConfig
from jaxllm.distributed import DistributedConfig
from jaxllm.models.config import ModelConfig
from jaxllm.models.generation import GenerateConfig
from jaxllm.models.lora import LoraConfig
from jaxllm.sharding import MeshConfig
from jaxllm.train.checkpoint import CheckpointConfig
from jaxllm.train.optimizer import OptimConfig
from jaxllm.train.preference import PreferenceConfig
from jaxllm.train.prune import PruneConfig
from jaxllm.train.run import TrainConfig

# The model section holds the run switches only: the shapes (vocab_size, num_layers, embed_dim, num_heads,
# num_kv_heads, head_dim, mlp_dim, max_seq_len, rope_theta, norm_eps, tie_embeddings, the family switches, ...)
# come from each config, or from init_from's config.json with checkpoint.model_from_init (which refuses
# shape keys in the model section); the lora_* and quantization fields come from the lora section.
MODEL_RUN_SWITCHES = (
    "embed_dropout",
    "attn_dropout",
    "resid_dropout",
    "scan_layers",
    "remat",
    "sequence_parallel",
    "gather_head",
    "param_dtype",
    "dtype",
    "attention",
    "init_std",
)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init and dropout
    c.model = defaults(ModelConfig, only=MODEL_RUN_SWITCHES)
    c.data = defaults(DataConfig)
    c.optim = defaults(OptimConfig)
    c.train = defaults(TrainConfig)
    c.mesh = defaults(MeshConfig)
    c.checkpoint = defaults(CheckpointConfig)
    c.generate = defaults(GenerateConfig)
    c.distributed = defaults(DistributedConfig)
    c.lora = defaults(LoraConfig)
    c.preference = defaults(PreferenceConfig)
    c.prune = defaults(PruneConfig)
    return c
