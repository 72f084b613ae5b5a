"""Evaluation of trained checkpoints, above the runtime: loading a checkpoint's weights for sampling (checkpoints),
generation and scoring of a prompt set (generate), reports with confidence intervals (report) and the video
metrics (video_metrics). The statistics they share with the training-time monitor are in branchgrpo.core.diversity,
the image feature extractors in branchgrpo.rewards.features."""
