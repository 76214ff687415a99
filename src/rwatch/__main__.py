from rwatch.cli import main

main()
