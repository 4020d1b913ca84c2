/* cli: the `tailcoat` command line (Headscale's verbs) and the `serve`
 * lifecycle. main.c calls tc_cli_main and nothing else.
 *
 * Threads: tc_cli_main runs on the main thread; `serve` starts the server's
 * threads and blocks in a signal loop until SIGTERM/SIGINT. */
#ifndef TC_CLI_CLI_H
#define TC_CLI_CLI_H

/* Runs the command line; returns the process exit status (0 ok, 1 error,
 * 2 usage). */
int tc_cli_main(int argc, char **argv);

/* A callback run on SIGHUP by `serve` (policy file, TLS certificate, ...).
 * Register before or during serve; runs on the main thread. 0 or TC_E*. */
typedef void (*tc_reload_fn)(void *ctx);
int tc_cli_on_reload(tc_reload_fn fn, void *ctx);

#endif
