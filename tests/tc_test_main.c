#include "tc_test.h"
int main(int argc, char **argv) { return tc_test_main(argc, argv); }
