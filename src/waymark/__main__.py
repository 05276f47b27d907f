from waymark.cli.main import main

main()
