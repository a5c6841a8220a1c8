"""Training: one trainer (trainer) that runs any task (rankkd.tasks: imagenet, cifar100, coco) through the task
contract (task), its frozen settings (config), the epoch loop (loop), and by concern checkpoints, run folders,
progress, optimizer and schedules, the demo teacher's cache and evaluation metrics."""
