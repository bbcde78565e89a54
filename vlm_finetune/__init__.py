"""vlm_finetune: fine-tune vision-language models (GLM-4V, MGM) on the GPUs you have."""

from vlm_finetune.hardware import env_global_rank

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """`${vlm_rank_zero:x}`: x on the process of global rank 0 (launcher's RANK / SLURM_PROCID), else null;
    `${vlm_rank_zero_file:path}`: path on rank 0, else os.devnull. conf/train.yaml uses them so that only
    rank 0 of a multi-process job writes Hydra's config copy and log file."""
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("vlm_rank_zero"):
        OmegaConf.register_new_resolver("vlm_rank_zero", lambda value: value if env_global_rank() == 0 else None)
    if not OmegaConf.has_resolver("vlm_rank_zero_file"):
        OmegaConf.register_new_resolver("vlm_rank_zero_file",
                                        lambda path: path if env_global_rank() == 0 else os.devnull)


_register_resolvers()
