"""What the trainers in train/ share and nothing else needs: input pipelines (data), evaluation metrics (metrics),
and run plumbing (utils: distributed set-up, checkpoints, schedules, metrics files, progress)."""
