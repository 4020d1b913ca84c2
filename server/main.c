/* main: the tailcoat binary's entry point; everything lives in the CLI
 * module (server/cli), which also runs `serve`. */
#include "cli/cli.h"

int main(int argc, char **argv) { return tc_cli_main(argc, argv); }
