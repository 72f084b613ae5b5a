"""branchgrpo: tree-structured GRPO (BranchGRPO) and its relatives for flow-matching image and video generators."""

__version__ = "0.1.0"
