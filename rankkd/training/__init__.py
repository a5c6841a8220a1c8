"""What the trainers in train/ share and nothing else needs: their options and settings (config), the epoch loop,
evaluation, checkpoints and the teacher cache (loop), input pipelines (data), evaluation metrics (metrics), and run
plumbing (utils: distributed set-up, run lock, checkpoint files, schedules, metrics files, progress)."""
