#include <db.h>
