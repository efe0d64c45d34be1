from rsg_eval.cli import main

main()
