"""A grid of training runs, one process per cell, resumable, with a table of the finished cells (the CIFAR-100
table's runner, train/cifar100_table.py):

    cells      the grid's axes, each cell's trainer options, and the checks of every cell before any run starts
    scheduler  where the runs go (GPU slots, CPU threads), their processes, claims and done/failed markers
    launchers  the cells as submitit jobs (on this machine or as a SLURM job array) and each cell's state
    report     the table of the finished cells: table.md, results.csv, table.png
"""
