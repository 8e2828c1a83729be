/*
 * hashsort.c: the C file compiled (by gcc's cc1, under valgrind lackey) to
 * record traces/cc1-O2.smtrace; an input to a compiler, not part of
 * shadow-mmu. Counts the words of a text in a chained hash table, sorts
 * them by count with a merge sort, and prints the top ten.
 *
 * It also runs: `gcc -O2 hashsort.c && ./a.out` prints the ten most
 * frequent words.
 */
/* No #include: the file is self-contained (and the trace does not depend on
 * the machine's libc headers); these are the C library's declarations. */
typedef unsigned long size_t;
int printf(const char *fmt, ...);
void *calloc(size_t n, size_t size);
void *memcpy(void *dst, const void *src, size_t n);
int strncmp(const char *a, const char *b, size_t n);
size_t strcspn(const char *s, const char *reject);

#define NBUCKETS 256

struct word {
	struct word *next;
	unsigned hash;
	int count;
	char text[24];
};

static struct word *buckets[NBUCKETS];
static struct word *all[1024];
static int nwords;

static unsigned hash(const char *s, size_t n)
{
	unsigned h = 2166136261u;
	while (n--)
		h = (h ^ (unsigned char)*s++) * 16777619u;
	return h;
}

static void count(const char *s, size_t n)
{
	unsigned h = hash(s, n);
	struct word **pp = &buckets[h % NBUCKETS], *w;
	for (w = *pp; w; w = w->next)
		if (w->hash == h && !strncmp(w->text, s, n) && !w->text[n]) {
			w->count++;
			return;
		}
	if (nwords == 1024 || n >= sizeof(w->text) || !(w = calloc(1, sizeof(*w))))
		return;
	w->hash = h;
	w->count = 1;
	memcpy(w->text, s, n);
	w->next = *pp;
	*pp = all[nwords++] = w;
}

static void merge_sort(struct word **a, struct word **tmp, int n)
{
	int h = n / 2, i = 0, j = h, k = 0;
	if (n < 2)
		return;
	merge_sort(a, tmp, h);
	merge_sort(a + h, tmp, n - h);
	while (i < h && j < n)
		tmp[k++] = a[i]->count >= a[j]->count ? a[i++] : a[j++];
	while (i < h)
		tmp[k++] = a[i++];
	while (j < n)
		tmp[k++] = a[j++];
	memcpy(a, tmp, n * sizeof(*a));
}

static const char text[] =
	"the shadow mmu write protects the pages of a guest so that the first write to a page "
	"faults and the fault marks the page dirty in the bitmap and makes the page writable "
	"again while the migration thread harvests the bitmap and copies the pages it reports";

int main(void)
{
	static struct word *tmp[1024];
	const char *p = text;
	while (*p) {
		size_t n = strcspn(p, " ");
		if (n)
			count(p, n);
		p += n + (p[n] == ' ');
	}
	merge_sort(all, tmp, nwords);
	for (int i = 0; i < nwords && i < 10; i++)
		printf("%3d %s\n", all[i]->count, all[i]->text);
	return 0;
}
