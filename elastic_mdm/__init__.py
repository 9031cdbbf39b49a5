"""Elastic Masked Diffusion Models as a native Hugging Face Transformers integration."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_elastic_mdm import ElasticMDMConfig
from .generation_config_elastic_mdm import ElasticMDMGenerationConfig
from .modeling_elastic_mdm import ElasticMDMForDiffusionLM, ElasticMDMModel, ElasticMDMOutput
from .objectives.collators import ElasticMDMCollator, MDLMCollator
from .packing_elastic_mdm import PackedSequences
from .sampler_elastic_mdm import sample_elastic
from .sampler_loop_elastic_mdm import ElasticMDMGenerateOutput, SamplerOptions
from .sampler_mdlm_elastic_mdm import sample_mdlm
from .schedules_elastic_mdm import SCHEDULES, NoiseLevelSampler, RevealSchedule, get_schedule

AutoConfig.register("elastic_mdm", ElasticMDMConfig)
AutoModel.register(ElasticMDMConfig, ElasticMDMForDiffusionLM)
AutoModelForMaskedLM.register(ElasticMDMConfig, ElasticMDMForDiffusionLM)

__version__ = "0.1.0"

__all__ = [
    "ElasticMDMConfig",
    "ElasticMDMModel",
    "ElasticMDMForDiffusionLM",
    "ElasticMDMOutput",
    "ElasticMDMGenerationConfig",
    "ElasticMDMGenerateOutput",
    "PackedSequences",
    "RevealSchedule",
    "NoiseLevelSampler",
    "SCHEDULES",
    "get_schedule",
    "SamplerOptions",
    "sample_elastic",
    "sample_mdlm",
    "ElasticMDMCollator",
    "MDLMCollator",
]
