/* mapper_int.h: helpers shared by the mapper's own files only. */
#ifndef TC_MAPPER_INT_H
#define TC_MAPPER_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "mapper/mapper.h"

/* Canonical text of an IP prefix ("10.0.0.0/8", "fd7a::/48"), host bits
 * masked. 0 or TC_EINVAL. out >= 64 bytes. */
int tc_mapper_prefix_canon(const char *s, char out[64]);
/* Canonical "ip:port" / "[v6]:port". *drop is set for zoned and link-local
 * addresses, which peers cannot use. 0 or TC_EINVAL. out >= 64 bytes. */
int tc_mapper_addrport_canon(const char *s, char out[64], bool *drop);

/* Appends "," unless *first, then "\"name\":". */
void tc_mapper_key(struct tc_buf *b, bool *first, const char *name);
void tc_mapper_json_time(struct tc_buf *b, int64_t t);
void tc_mapper_json_strv(struct tc_buf *b, const struct tc_strv *sv);

#endif
