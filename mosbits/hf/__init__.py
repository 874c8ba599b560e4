"""The Hugging Face training adapter: binarize, distil, pack, save and load transformers models with BinaryMoS layers.

::

    import mosbits.hf as mh                     # registers quant_method "mosbits" with transformers
    student = mh.binarize(AutoModelForCausalLM.from_pretrained(path), num_experts=4)
    mh.distill(student, teacher, texts, steps=1000, lr=2e-5, seq_len=512, batch_size=4)
    mh.pack(student)                            # MoSLinear -> PackedMoSLinear, in place
    student.save_pretrained(out)
    model = mh.load(out)                        # or AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)

A saved mosbits folder declares ``model_type = "mosbits"`` and carries a small loader module (`mosbits.hf.remote`):
``from_pretrained`` without ``trust_remote_code`` refuses it, and with it needs mosbits installed. It never loads
as a dense model with random weights. `load` loads and checks.

Needs torch and transformers (``pip install 'mosbits[hf]'``); ``import mosbits`` alone imports neither.
"""

from mosbits.hf.calibration import CalibrationReport, calibrate
from mosbits.hf.checkpoints import convert_binarymos
from mosbits.hf.config import MoSConfig
from mosbits.hf.distillation import DistillationTrainer, distill, distillation_loss
from mosbits.hf.evaluate import ModelSize, generation_speed, model_size, perplexity
from mosbits.hf.layers import DecodeLinear, MoSLinear, PackedMoSLinear, set_precision, trainable_scales
from mosbits.hf.quantizer import MoSHfQuantizer, check_packed, load, register
from mosbits.hf.surgery import binarize, pack
from mosbits.hf.synthetic import random_packed

register()

__all__ = [
    "CalibrationReport",
    "DecodeLinear",
    "DistillationTrainer",
    "MoSConfig",
    "MoSHfQuantizer",
    "MoSLinear",
    "ModelSize",
    "PackedMoSLinear",
    "binarize",
    "calibrate",
    "check_packed",
    "convert_binarymos",
    "distill",
    "distillation_loss",
    "generation_speed",
    "load",
    "model_size",
    "pack",
    "perplexity",
    "random_packed",
    "set_precision",
    "trainable_scales",
]
