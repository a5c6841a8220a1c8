"""A grid of training runs, one process per cell, resumable, with a table of the finished cells (the CIFAR-100
table's runner, train/cifar100_table.py):

    cells      the grid's axes, each cell's trainer options, and the checks of every cell before any run starts
    scheduler  where the runs go (GPU slots, CPU threads), their processes, claims and done/failed markers
    report     the table of the finished cells: table.md, results.csv, table.png
"""
