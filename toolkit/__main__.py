from toolkit.app.cli import main

main()
