from clp_lightning.cli import main

main()
