from kdtrack.cli import main

main(prog_name="kdtrack")
