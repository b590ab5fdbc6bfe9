"""One module per `sktlm <command>`: its absl flags and `main(argv)`. Keep these thin."""
