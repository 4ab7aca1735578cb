from splinter.cli import main

main()
