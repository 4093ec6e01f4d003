// QoS limits between the datapath proto (v1::QosLimits, v1::QosPatch) and the pool's types. The
// proto and the pool spell every limit as common/qos_fields.h names it, so each conversion
// expands that table. The API service converts with these, and the fuzz targets check the API's
// answers through the same functions rather than a copy.
#pragma once

#include "common/qos_fields.h"
#include "datapath/api/datapath.pb.h"
#include "datapath/pool/qos.h"

namespace nbdcsi::datapath {

inline QosLimits FromProto(const v1::QosLimits& p) {
  QosLimits q;
#define NBDCSI_QOS_FROM(f, key, flag, kind, help) q.f = p.f();
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_FROM)
#undef NBDCSI_QOS_FROM
  return q;
}

inline void ToProto(const QosLimits& q, v1::QosLimits* p) {
#define NBDCSI_QOS_TO(f, key, flag, kind, help) p->set_##f(q.f);
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_TO)
#undef NBDCSI_QOS_TO
}

// Only the limits the patch carries are set.
inline QosPatch FromProto(const v1::QosPatch& p) {
  QosPatch q;
#define NBDCSI_QOS_PATCH(f, key, flag, kind, help) \
  if (p.has_##f()) q.f = p.f();
  NBDCSI_QOS_FIELDS(NBDCSI_QOS_PATCH)
#undef NBDCSI_QOS_PATCH
  return q;
}

}  // namespace nbdcsi::datapath
