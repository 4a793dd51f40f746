/* compress: COMPRESS=DEFLATE (RFC 4978) towards the client, terminated here like TLS: a zlib filter bufferevent over the client's link. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "compress.h"

/*
 * RFC 4978 3: raw DEFLATE (RFC 1951), no zlib header, both ways; the
 * server compresses everything after its tagged OK. Memory per session is
 * what zlib needs for a 32 KiB window each way: deflate with memLevel 5
 * (about 128 KiB + 16 KiB) and inflate (about 32 KiB + 7 KiB).
 */
#define COMPRESS_LEVEL 6
#define COMPRESS_MEMLEVEL 5
#define COMPRESS_CHUNK 16384

struct compress_ctx {
	z_stream in, out;
	int in_ok, out_ok;
};

static void
compress_ctx_free(void *arg)
{
	struct compress_ctx *c = arg;

	if (c->in_ok)
		inflateEnd(&c->in);
	if (c->out_ok)
		deflateEnd(&c->out);
	free(c);
}

/* Run one zlib stream from src to dst until src is empty (and, when
 * flushing, until zlib has nothing more to give). */
static enum bufferevent_filter_result
compress_run(z_stream *z, int deflating, struct evbuffer *src, struct evbuffer *dst,
    ev_ssize_t limit, int flush)
{
	size_t produced = 0;

	for (;;) {
		struct evbuffer_iovec in, out;
		int n_in = evbuffer_peek(src, -1, NULL, &in, 1), rc;
		size_t took, gave;

		if (n_in < 1)
			in.iov_base = NULL, in.iov_len = 0;
		if (in.iov_len == 0 && !flush)
			break;
		if (evbuffer_reserve_space(dst, COMPRESS_CHUNK, &out, 1) < 1)
			return BEV_ERROR;
		z->next_in = in.iov_base;
		z->avail_in = (uInt)in.iov_len;
		z->next_out = out.iov_base;
		z->avail_out = (uInt)out.iov_len;
		rc = deflating ? deflate(z, flush ? Z_SYNC_FLUSH : Z_NO_FLUSH) : inflate(z, Z_SYNC_FLUSH);
		took = in.iov_len - z->avail_in;
		gave = out.iov_len - z->avail_out;
		out.iov_len = gave;
		evbuffer_commit_space(dst, &out, 1);
		evbuffer_drain(src, took);
		produced += gave;
		if (rc == Z_STREAM_END || (rc != Z_OK && rc != Z_BUF_ERROR))
			return rc == Z_STREAM_END ? BEV_OK : BEV_ERROR;
		/* Done when zlib took nothing and gave nothing more, with room to spare. */
		if (took == 0 && gave < COMPRESS_CHUNK && (in.iov_len == 0 || rc == Z_BUF_ERROR))
			break;
		if (limit >= 0 && produced >= (size_t)limit && !flush)
			break;
	}
	return produced > 0 ? BEV_OK : BEV_NEED_MORE;
}

static enum bufferevent_filter_result
compress_input(struct evbuffer *src, struct evbuffer *dst, ev_ssize_t limit,
    enum bufferevent_flush_mode mode, void *arg)
{
	struct compress_ctx *c = arg;

	(void)mode;
	return compress_run(&c->in, 0, src, dst, limit, 0);
}

static enum bufferevent_filter_result
compress_output(struct evbuffer *src, struct evbuffer *dst, ev_ssize_t limit,
    enum bufferevent_flush_mode mode, void *arg)
{
	struct compress_ctx *c = arg;

	/* Every batch goes out whole: a response must not wait in zlib for more. */
	(void)mode;
	if (evbuffer_get_length(src) == 0)
		return BEV_NEED_MORE;
	return compress_run(&c->out, 1, src, dst, -1, 1);
}

struct bufferevent *
compress_wrap(struct bufferevent *under)
{
	struct compress_ctx *c = calloc(1, sizeof(*c));
	struct bufferevent *bev;

	if (c == NULL)
		return NULL;
	if (inflateInit2(&c->in, -15) != Z_OK) {
		free(c);
		return NULL;
	}
	c->in_ok = 1;
	if (deflateInit2(&c->out, COMPRESS_LEVEL, Z_DEFLATED, -15, COMPRESS_MEMLEVEL,
	    Z_DEFAULT_STRATEGY) != Z_OK) {
		compress_ctx_free(c);
		return NULL;
	}
	c->out_ok = 1;
	bev = bufferevent_filter_new(under, compress_input, compress_output,
	    BEV_OPT_CLOSE_ON_FREE, compress_ctx_free, c);
	if (bev == NULL)
		compress_ctx_free(c);
	return bev;
}

int
compress_active(struct bufferevent *bev)
{
	return bev != NULL && bufferevent_get_underlying(bev) != NULL;
}
