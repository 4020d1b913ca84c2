/* main: command-line entry point. Dispatches to the CLI module when it is
 * built in; until then only `version` works. */
#include <stdio.h>
#include <string.h>

#include "base/base.h"

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "version")) {
    printf("tailcoat %s\n", TC_VERSION);
    return 0;
  }
  fprintf(stderr, "usage: tailcoat version\n");
  return 2;
}
