from netwatch.cli import main

main()
