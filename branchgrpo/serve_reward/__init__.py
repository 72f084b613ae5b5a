"""`python -m branchgrpo.serve_reward`: serve registered rewards over HTTP for the `remote` reward
(branchgrpo.rewards.remote; the server is in `server.py`). An entry point in the top layer; nothing imports it."""
