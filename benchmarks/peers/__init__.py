"""Peer pruning methods for `benchmarks/llm_pruning.py`: NOT part of the prunetune library.

Each peer works on a plain transformers LLaMA model (`LlamaForCausalLM`, grouped-query attention included)
with torch and transformers only, so that what it measures is the peer, not prunetune's machinery:

* `torch_pruning_peer`: Torch-Pruning 1.6 (PyPI `torch-pruning`) with its LLM example's settings;
* `shortgpt`: ShortGPT-style layer dropping by block influence;
* `wanda_sp`: the Wanda-sp and FLAP structured baselines, after the FLAP authors' code.

`common` holds their shared plumbing (layer inputs on calibration data, head/neuron/layer removal).
"""
