"""Training: one run skeleton (run) over tasks (tasks/: imagenet, cifar100, coco), its frozen settings (config), the
epoch loop (loop), and by concern distributed set-up, checkpoints, run folders, progress, optimizer and schedules,
the demo teacher's cache, evaluation metrics, input pipelines (data) and the CIFAR-100 grid runner (grid)."""
