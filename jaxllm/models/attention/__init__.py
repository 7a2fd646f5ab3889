"""Every attention path, in one home:

reference.py     the causal/document mask, ALiBi slopes and bias, the float32 reference attention
fused.py         `fused_attention`: cuDNN flash attention on GPU, else XLA in causal query blocks
flash.py         Pallas flash attention on TPU (Splash for rotary models), per device under a mesh
flash_alibi.py   our Pallas kernel with the ALiBi bias computed in-kernel (BLOOM)
module.py        the `Attention` module: projections, positions, KV cache, and which path runs
"""
