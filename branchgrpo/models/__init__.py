"""Backbone adapters (see base.py for the contract)."""

from branchgrpo.models.base import FlowAdapter, check_embedding_keys, gather_cond  # noqa: F401
