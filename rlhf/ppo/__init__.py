"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), built from the parts TRL 1.16 still ships.

TRL moved `PPOTrainer` to `trl.experimental` and removed it in 1.13. This package keeps its names
(`PPOConfig` fields, `objective/kl`-style log keys, `checkpoint-<step>/` folders) so a user of the old
trainer feels at home, and assembles it from accelerate (`Accelerator`, `save_state`), transformers'
trainer machinery (`TrainerState`, `TrainerControl`, `CallbackHandler`, `get_scheduler`,
`rotate_checkpoints`) and TRL's utilities (`selective_log_softmax`, `entropy_from_logits`, `use_adapter`;
`disable_dropout_in_model` through `rlhf.dropout.disable_dropout`, which zeroes attention dropout too).

  config      PPOConfig
  core        the math as pure functions (response_mask, kl_penalty, compute_gae, whiten, policy_loss,
              value_loss, ...), the KL controllers and the bad-number checks
  models      policy + value trained as one module, the reference, frozen scorers
  rollout     which prompts, generation, reward scoring, the Rollout record
  checkpoint  checkpoint-<update>/ folders through Accelerator.save_state / load_state
  timing      Stopwatch: the seconds of each part of an update, logged as timing/*
  trainer     PPOTrainer: the loop
"""

from rlhf.ppo.config import PPOConfig
from rlhf.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    HealthMonitor,
    KLController,
    compute_gae,
    kl_penalty,
    masked_mean,
    policy_loss,
    response_mask,
    shape_rewards,
    value_loss,
    whiten,
)
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.trainer import PPOTrainer

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "HealthMonitor",
    "KLController",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "compute_gae",
    "kl_penalty",
    "masked_mean",
    "policy_loss",
    "response_mask",
    "shape_rewards",
    "value_loss",
    "whiten",
]
