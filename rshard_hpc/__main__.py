from rshard_hpc.cli import main

main()
