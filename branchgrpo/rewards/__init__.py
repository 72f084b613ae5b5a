"""Reward models. `available_rewards()` / `build_reward()` import the built-in reward modules
(`base.BUILTIN_REWARD_MODULES`), each of which registers its factories with `@register_reward(name)`; heavy imports
happen inside the factories."""

from branchgrpo.rewards.base import (  # noqa: F401
    COMBINE_MODES,
    DEFAULT_MODEL_DIR,
    RewardModel,
    RewardSet,
    available_rewards,
    build_reward,
    build_reward_set,
    decode_and_score,
    parse_reward_spec,
    register_reward,
)
