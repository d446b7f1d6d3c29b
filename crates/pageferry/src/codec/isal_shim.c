/* One-shot deflate with the system's ISA-L (igzip), for codec/deflate.rs. Compiled against the
 * installed header by build.rs, so the isal_zstream layout always matches the library. */
#include <stdint.h>
#include <isa-l/igzip_lib.h>

/* Bytes of the level buffer level 1 needs (the caller allocates it once per compressor). */
uint32_t pageferry_isal_level_buf_size(void) { return ISAL_DEF_LVL1_DEFAULT; }

/* Compress in[0..in_len) as one stream (zlib framing when zlib != 0, else raw deflate) into
 * out[0..out_cap). Returns the compressed size, or 0 when it does not fit or ISA-L fails. */
uint32_t pageferry_isal_compress(const uint8_t *in, uint32_t in_len, uint8_t *out, uint32_t out_cap,
                                 uint32_t level, uint8_t *level_buf, uint32_t level_buf_size, int zlib)
{
    struct isal_zstream s;
    isal_deflate_stateless_init(&s);
    s.next_in = (uint8_t *)in;
    s.avail_in = in_len;
    s.next_out = out;
    s.avail_out = out_cap;
    s.level = level;
    s.level_buf = level_buf;
    s.level_buf_size = level_buf_size;
    s.end_of_stream = 1;
    s.flush = NO_FLUSH;
    s.gzip_flag = zlib ? IGZIP_ZLIB : IGZIP_DEFLATE;
    if (isal_deflate_stateless(&s) != COMP_OK)
        return 0;
    return s.total_out;
}
