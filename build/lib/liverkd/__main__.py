from liverkd.cli import main

main()
