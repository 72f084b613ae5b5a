"""Reward models. Importing this package registers the built-in reward factories."""

from branchgrpo.rewards.base import (  # noqa: F401
    COMBINE_MODES,
    RewardModel,
    RewardSet,
    available_rewards,
    build_reward,
    build_reward_set,
    parse_reward_spec,
    register_reward,
)
