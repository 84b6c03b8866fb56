from userpipe.cli import main

main()
