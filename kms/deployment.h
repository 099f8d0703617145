// The binding of a Custos database to its HSM token.
//
// `custosd --init` records, in the database, the token's label and serial
// and the id of a marker object it creates on the token (a CKO_DATA object
// labelled kDeploymentMarkerLabel whose value is the id: 16 random bytes,
// no secret). custosd then
// refuses to start on any mismatch: a database opened against another
// token, or a token opened with another deployment's database, would
// otherwise look like a database whose keys have all lost their material,
// or a token full of objects that no row names.
//
// Free functions over a Store and an Hsm; as thread-safe as those are.
#ifndef CUSTOS_KMS_DEPLOYMENT_H_
#define CUSTOS_KMS_DEPLOYMENT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "hsm/hsm.h"
#include "kms/store/store.h"

namespace custos::kms {

inline constexpr char kDeploymentMarkerLabel[] = "custos-deployment";

// What InitDeployment did.
enum class InitOutcome {
  kCreated,       // a new deployment: marker made, binding recorded
  kAlreadyBound,  // the database was already bound to this token
};

// Binds `store` to the token `hsm` opens. Refuses (FAILED_PRECONDITION,
// naming the reason and the fix) when the token already carries another
// deployment's marker, or when the database is empty but the token holds
// Custos key objects (a lost or replaced database: a new deployment over
// existing key material would quarantine it all). A database that already
// has keys but no binding (made before bindings existed) is bound as it is.
absl::StatusOr<InitOutcome> InitDeployment(Store& store, hsm::Hsm& hsm,
                                           absl::Time now);

// OK when the database is bound to exactly this token: same label, same
// serial, and the marker present. Otherwise FAILED_PRECONDITION saying
// which of them differs.
absl::Status CheckDeployment(Store& store, hsm::Hsm& hsm);

}  // namespace custos::kms

#endif  // CUSTOS_KMS_DEPLOYMENT_H_
